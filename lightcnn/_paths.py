"""Per-user folders, following each platform's convention (what `platformdirs` would answer).

    Linux/BSD   $XDG_CACHE_HOME/lightcnn, else ~/.cache/lightcnn
    macOS       ~/Library/Caches/lightcnn
    Windows     %LOCALAPPDATA%\\lightcnn\\Cache
"""

import os
import sys
import tempfile


def user_cache_dir():
    """The user's cache folder for lightcnn (not created here)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
        return os.path.join(base, "lightcnn", "Cache")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/lightcnn")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "lightcnn")


def writable_dir(path):
    """Create `path` if needed and check that a file can be written there; True or False, never raises."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False
