"""Image datasets on disk and leak-free train/val/test splits.

A `Dataset` is a plain list of `Item(path, label, group, split)` plus the class names:

    label   int in [0, K)          index into `class_names` (sorted, so the order never depends on the file system)
    group   str or None            patient / source id; items sharing a group must stay on one side of every split
    split   "train"|"val"|"test"|None   a split shipped with the data (e.g. UCSD's official one)

`discover(root)` reads, in this order of preference,
  1. an explicit CSV (`file, label[, group|patient|patient_id][, split]`, paths relative to `root`);
  2. `root/manifest.csv` when it has the columns of one of the two bundled sets:
       covid-ct-ucsd      file, class, split_ucsd, patient_id     -> group = "<class>/<patient id stripped>",
                          split = split_ucsd (UCSD's official patient-disjoint split)
       covid-xray-3class  file, class, ..., figure1_image_id       -> group derived from the file name
                          (see `xray_group`), split = None (the original train/test folders leak: ignore them)
  3. class folders `root/<class>/**/<image>` (image extensions only, recursive, sorted).

Why groups matter: slices of one patient (or crops of one figure) are near-duplicates. If they straddle train and
test, the test score measures memory, not generalisation. Every splitter here keeps a group on one side, and
`split_dataset` warns loudly (`UngroupedSplitWarning`) whenever items without a group id are split at random.

Splitters take label arrays `labels (N,)` (ints) and optional `groups (N,)` (hashables; None = "its own group") and
return sorted int64 index arrays. They are deterministic functions of `seed` and of the order of the inputs.
This module does not read pixels; decoding lives in `lightcnn.preprocess`.
"""

from __future__ import annotations

import csv as _csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from lightcnn.dicom import looks_like_dicom
from lightcnn.errors import LightCNNError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm"})
SPLIT_NAMES = ("train", "val", "test")
# Spellings of the split values met in the wild, mapped onto SPLIT_NAMES.
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
# CSV column names accepted for each role (first match wins).
_LABEL_COLUMNS = ("label", "class")
_GROUP_COLUMNS = ("group", "patient", "patient_id")
_SPLIT_COLUMNS = ("split", "split_ucsd")


class DatasetError(LightCNNError, ValueError):
    """A dataset folder or CSV is malformed (missing file, unknown column, bad split value...)."""


class DataCheckError(DatasetError):
    """The images cannot make a meaningful run (check_training_data); `problems` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class UngroupedSplitWarning(UserWarning):
    """Items without a group/patient id were split at random: near-duplicates may straddle train and test."""


class Item(NamedTuple):
    path: Path
    label: int
    group: str | None
    split: str | None


@dataclass
class Dataset:
    """`items` in a fixed order, `class_names[label]` names each label, `root` is where paths were resolved."""

    items: list[Item]
    class_names: list[str]
    root: Path | None = None
    source: str = "folders"  # "folders" | "csv" | "covid-ct-ucsd" | "covid-xray-3class"
    notes: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def paths(self) -> list[Path]:
        return [it.path for it in self.items]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class indices."""
        return np.fromiter((it.label for it in self.items), dtype=np.int64, count=len(self.items))

    @property
    def groups(self) -> list[str | None]:
        """(N,) group ids, None where unknown."""
        return [it.group for it in self.items]

    @property
    def splits(self) -> list[str | None]:
        return [it.split for it in self.items]

    @property
    def has_groups(self) -> bool:
        return any(it.group is not None for it in self.items)

    @property
    def has_split(self) -> bool:
        """True when every item carries a shipped split (a partial split is treated as none)."""
        return len(self.items) > 0 and all(it.split is not None for it in self.items)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def subset(self, idx) -> "Dataset":
        """A new Dataset with the items at `idx` (same class names)."""
        return Dataset([self.items[int(i)] for i in idx], list(self.class_names), self.root, self.source,
                       list(self.notes))


# --------------------------------------------------------------------------------------------- discovery


def discover(root, csv=None) -> Dataset:
    """Find the images under `root` and their labels, groups and shipped split.

    root       a folder: `root/<class>/**/<image>`, or a bundled dataset with its `manifest.csv`
    csv        optional CSV with columns `file, label` and optionally `group` (or `patient`, `patient_id`) and
               `split` (train/val/test); `file` is relative to `root` (or absolute). When given, it is the
               only source of items.
    Raises DatasetError naming the file when something listed does not exist or a column is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    if csv is not None:
        return _from_csv(root, Path(csv), source="csv")
    manifest = root / "manifest.csv"
    if manifest.is_file():
        columns = _csv_columns(manifest)
        if {"file", "class", "split_ucsd", "patient_id"} <= columns:
            return _from_csv(root, manifest, source="covid-ct-ucsd")
        if {"file", "class", "figure1_image_id"} <= columns:
            return _from_csv(root, manifest, source="covid-xray-3class")
    return _from_folders(root)


def _csv_columns(path: Path) -> set[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return {c.strip() for c in next(_csv.reader(f), [])}


def _pick(columns, candidates):
    return next((c for c in candidates if c in columns), None)


def _from_folders(root: Path) -> Dataset:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names, items = [], []
    for class_dir in class_dirs:
        # Sorted relative POSIX paths: the same tree gives the same order on every OS and file system.
        files = sorted((p for p in class_dir.rglob("*")
                        if p.is_file() and (p.suffix.lower() in IMAGE_EXTENSIONS
                                            or (not p.suffix and looks_like_dicom(p)))  # DICOM series files
                        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)),
                       key=lambda p: p.relative_to(class_dir).as_posix())
        if not files:
            continue  # a folder without images is not a class (e.g. metadata/)
        label = len(class_names)
        class_names.append(class_dir.name)
        items.extend(Item(p, label, None, None) for p in files)
    if not items:
        raise DatasetError(f"{root}: no images found in class folders (expected {root}/<class>/<image>)")
    return Dataset(items, class_names, root, "folders")


def _from_csv(root: Path, path: Path, source: str) -> Dataset:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = _csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    label_col = _pick(columns, _LABEL_COLUMNS)
    if "file" not in columns or label_col is None:
        raise DatasetError(f"{path}: needs columns 'file' and 'label' (or 'class'); found {columns}")
    group_col = _pick(columns, _GROUP_COLUMNS)
    split_col = _pick(columns, _SPLIT_COLUMNS)

    class_names = _sorted_names({row[label_col].strip() for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    items, missing = [], []
    for line, row in enumerate(rows, start=2):
        # Names are taken literally: UCSD files contain '%' and must not be URL-decoded.
        rel = row["file"]
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        if not p.is_file():
            missing.append(f"line {line}: {rel}")
        label_name = row[label_col].strip()
        group = _clean(row.get(group_col)) if group_col else None
        if source == "covid-ct-ucsd" and group is not None:
            # COVID ids are "Patient N", non-COVID ids crawled_/medpix_patient_N: prefix by class so that two
            # name spaces can never merge by accident.
            group = f"{label_name}/{group}"
        elif source == "covid-xray-3class":
            group = xray_group(rel, row.get("figure1_image_id"))
        split = _parse_split(row.get(split_col), path, line) if split_col else None
        items.append(Item(p, index[label_name], group, split))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise DatasetError(f"{path}: listed files not found under {root}: {shown}")
    notes = []
    if source == "covid-xray-3class":
        n_none = sum(it.group is None for it in items)
        notes.append(f"{n_none} of {len(items)} X-rays have no patient id (numbered files); they are treated as "
                     f"their own group")
    return Dataset(items, class_names, root, source, notes)


def _sorted_names(names):
    # Numeric labels sort as numbers ("2" before "10"); anything else sorts as text.
    names = list(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _clean(value):
    # Strip whitespace: one UCSD id is "Patient 180 " with a trailing space and must equal "Patient 180".
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_split(value, path, line):
    value = _clean(value)
    if value is None:
        return None
    try:
        return _SPLIT_ALIASES[value.lower()]
    except KeyError:
        raise DatasetError(f"{path}: line {line}: unknown split {value!r} (expected train/val/test)") from None


_FIGURE1 = re.compile(r"(COVID-\d+)[a-z]?$", re.IGNORECASE)
_AUNTMINNIE = re.compile(r"auntminnie-(?:[a-z]-)?(.+)$", re.IGNORECASE)


def xray_group(file_name, figure1_image_id=None):
    """Group id of one covid-xray-3class image, or None when the name carries no patient information.

    * Figure 1 images `COVID-00003a` / `COVID-00003b` show one patient: the trailing letter is dropped
      -> "figure1:COVID-00003" (the manifest's `figure1_image_id` is used when present, else the file stem).
    * auntminnie images `auntminnie-a-<case>` ... `auntminnie-d-<case>` share one case -> "auntminnie:<case>".
    * Numbered files (`012.jpeg`) have no known source: None.
    """
    stem = Path(file_name).stem
    fig1 = _FIGURE1.match(_clean(figure1_image_id) or stem)
    if fig1:
        return "figure1:" + fig1.group(1).upper()
    am = _AUNTMINNIE.match(stem)
    if am:
        return "auntminnie:" + am.group(1)
    return None


# --------------------------------------------------------------------------------------------- splitting


def _check_fractions(fractions):
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) < 2 or np.any(f < 0) or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    return f


def _group_codes(groups, n):
    """Map groups (N,) to dense int codes; None (or no groups at all) gives each item its own code."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries, labels has {n}")
    codes, table = np.empty(n, dtype=np.int64), {}
    for i, g in enumerate(groups):
        key = ("item", i) if g is None else ("group", g)
        codes[i] = table.setdefault(key, len(table))
    return codes


def stratified_split(labels, fractions=(0.8, 0.1, 0.1), seed=0) -> tuple[np.ndarray, ...]:
    """Split indices so that every class is divided in `fractions` (one sorted index array per fraction).

    Per class c with n_c items: the items are shuffled, part p gets floor(n_c * f_p) of them, and the few left
    over go to the parts with the largest fractional remainders (ties broken at random), so every part holds
    n_c * f_p items up to one. Ignores groups: use `group_stratified_split` when items can be related.
    """
    labels = np.asarray(labels)
    f = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    parts = [[] for _ in f]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        exact = len(idx) * f
        counts = np.floor(exact).astype(np.int64)
        left = len(idx) - counts.sum()
        # Largest remainder first; a random secondary key keeps ties from always favouring the earlier part.
        order = np.lexsort((rng.random(len(f)), -(exact - counts)))
        counts[order[:left]] += 1
        for p, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[p].append(chunk)
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts)


def _assign_groups(labels, codes, targets, rng):
    """Greedy assignment of whole groups to parts; returns part (N,) int.

    targets (P, K): wanted item count of class k in part p. Groups are visited largest first (random order among
    equal sizes); each goes to the part where it most reduces the squared distance between current and target
    class counts, i.e. argmin_p sum_k v_k * (count[p,k] - target[p,k]) for the group's class counts v. Ties go
    to the part with the fewest items relative to its total target, then to the lower index.
    """
    classes, y = np.unique(labels, return_inverse=True)
    n_groups = codes.max() + 1 if len(codes) else 0
    v = np.zeros((n_groups, len(classes)), dtype=np.float64)
    np.add.at(v, (codes, y), 1.0)
    sizes = v.sum(axis=1)
    visit = rng.permutation(n_groups)
    visit = visit[np.argsort(-sizes[visit], kind="stable")]
    count = np.zeros_like(targets)
    total_target = np.maximum(targets.sum(axis=1), 1e-12)
    group_part = np.empty(n_groups, dtype=np.int64)
    for g in visit:
        cost = (count - targets) @ v[g]
        fill = count.sum(axis=1) / total_target
        # Zero-target parts must stay empty unless nothing else is possible.
        cost = np.where(targets.sum(axis=1) > 0, cost, np.inf)
        p = np.lexsort((np.arange(len(cost)), fill, np.round(cost, 9)))[0]
        group_part[g] = p
        count[p] += v[g]
    return group_part[codes]


def group_stratified_split(labels, groups, fractions=(0.8, 0.1, 0.1), seed=0) -> tuple[np.ndarray, ...]:
    """Like `stratified_split`, but every group lands in exactly one part.

    labels (N,) ints; groups (N,) hashables, None = an item with no known relatives. Stratification is
    approximate (whole groups move together); group-disjointness is exact. See `_assign_groups` for the rule.
    """
    labels = np.asarray(labels)
    f = _check_fractions(fractions)
    codes = _group_codes(groups, len(labels))
    _, y = np.unique(labels, return_inverse=True)
    targets = np.outer(f, np.bincount(y).astype(np.float64))
    part = _assign_groups(labels, codes, targets, np.random.default_rng(seed))
    return tuple(np.flatnonzero(part == p).astype(np.int64) for p in range(len(f)))


def stratified_group_kfold(labels, groups=None, k=10, seed=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield k pairs (train_idx, test_idx); every index is in exactly one test fold; groups never straddle.

    groups None -> plain stratified k-fold (each item its own group). Each fold targets n_c / k items of class c.
    Raises ValueError when there are fewer groups than folds.
    """
    labels = np.asarray(labels)
    codes = _group_codes(groups, len(labels))
    n_groups = len(np.unique(codes))
    if k < 2 or k > n_groups:
        raise ValueError(f"k={k} folds need 2 <= k <= number of groups ({n_groups})")
    _, y = np.unique(labels, return_inverse=True)
    targets = np.tile(np.bincount(y).astype(np.float64) / k, (k, 1))
    fold = _assign_groups(labels, codes, targets, np.random.default_rng(seed))
    everything = np.arange(len(labels))
    for i in range(k):
        test = fold == i
        yield everything[~test], everything[test]


class Split(NamedTuple):
    """Index arrays into the dataset, plus how they were made.

    method    "official" | "group" | "random"
    ungrouped number of items that had no group id (each treated as its own group)
    warned    True when an UngroupedSplitWarning was emitted
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    method: str
    ungrouped: int
    warned: bool


def split_dataset(ds: Dataset, how="auto", fractions=(0.8, 0.1, 0.1), seed=0) -> Split:
    """Split a Dataset into train/val/test index arrays.

    how  "auto"      the dataset's own split when every item has one, else "random"
         "official"  the dataset's own split (DatasetError if it has none)
         "random"    a fresh seeded split; whole groups move together whenever any group ids exist
         "group"     like "random" but refuses (DatasetError) a dataset without any group id
    fractions  (train, val, test) or (train, test); val is empty for two fractions.

    Whenever items without a group id are split at random, `UngroupedSplitWarning` is emitted and
    `Split.warned` is True: related images among them (slices of one patient) may straddle train and test,
    and the test score will then be optimistic.
    """
    if how not in ("auto", "official", "random", "group"):
        raise ValueError(f"how must be auto/official/random/group, got {how!r}")
    n = len(ds)
    groups = ds.groups
    ungrouped = sum(g is None for g in groups)
    if how == "official" or (how == "auto" and ds.has_split):
        if not ds.has_split:
            raise DatasetError(f"{ds.root}: no shipped split (need a split for every item) — use how='random'")
        split = np.array(ds.splits)
        parts = [np.flatnonzero(split == s).astype(np.int64) for s in SPLIT_NAMES]
        _check_official_disjoint(ds, parts)
        return Split(*parts, method="official", ungrouped=ungrouped, warned=False)
    if how == "group" and not ds.has_groups:
        raise DatasetError(f"{ds.root}: how='group' but the dataset has no group/patient ids")
    warned = False
    if ungrouped:
        what = "ANY group/patient ids" if ungrouped == n else f"group/patient ids for {ungrouped} of {n} items"
        warnings.warn(
            f"SPLITTING WITHOUT {what.upper()} ({ds.root}): images of one patient or source may land in both "
            f"train and test, which inflates test metrics. Provide a 'group' column to prevent this.",
            UngroupedSplitWarning, stacklevel=2)
        warned = True
    labels = ds.labels
    if ds.has_groups:
        parts = group_stratified_split(labels, groups, fractions, seed)
        method = "group"
    else:
        parts = stratified_split(labels, fractions, seed)
        method = "random"
    if len(parts) == 2:
        parts = (parts[0], np.empty(0, np.int64), parts[1])
    return Split(*parts, method=method, ungrouped=ungrouped, warned=warned)


def _check_official_disjoint(ds, parts):
    # A shipped split can leak too; say so rather than trust it silently.
    seen = {}
    for name, idx in zip(SPLIT_NAMES, parts):
        for i in idx:
            g = ds.items[i].group
            if g is not None:
                seen.setdefault(g, set()).add(name)
    straddling = sorted(g for g, s in seen.items() if len(s) > 1)
    if straddling:
        warnings.warn(f"{ds.root}: the shipped split puts {len(straddling)} groups in more than one split, "
                      f"e.g. {straddling[:3]}", UngroupedSplitWarning, stacklevel=3)


def file_sha256(path, chunk=1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_training_data(ds: Dataset, partitions, need=2) -> list[str]:
    """Refuse, before anything is computed, images that cannot make a meaningful run; return leak warnings.

    partitions  [(train idx, val idx, test idx), ...]: the one split, or every fold of a K-fold run
    need        images every class needs for the split (one per part: 3 for 8:1:1, K for K-fold)
    Raises DataCheckError with one line per problem: fewer than two classes, a class with fewer than `need`
    images, a class absent from the training or (non-empty) validation part of a partition, the same file
    content (SHA-256) under two class labels. Returns warnings (one line each): the same file content in more
    than one split, which leaks test images into training.
    """
    problems, where = [], ds.root or "the dataset"
    counts = ds.class_counts()
    if len(ds.class_names) < 2:
        problems.append(f"{where}: {len(ds.class_names)} class{'' if len(ds.class_names) == 1 else 'es'} "
                        f"({', '.join(ds.class_names) or 'none'}); fine-tuning needs at least two")
    for name, n in counts.items():
        if n < need:
            problems.append(f"{where}: class {name!r} has {n} image{'' if n == 1 else 's'}; the split needs at "
                            f"least {need} per class")
    labels = ds.labels
    for f, (train, val, _test) in enumerate(partitions):
        fold = f" of fold {f + 1}" if len(partitions) > 1 else ""
        for part, idx in (("training", train), ("validation", val)):
            if part == "validation" and len(idx) == 0:
                continue
            absent = [ds.class_names[c] for c in range(len(ds.class_names)) if not np.any(labels[idx] == c)]
            if absent:
                problems.append(f"{where}: the {part} split{fold} has no image of class "
                                f"{', '.join(repr(a) for a in absent)}")
    by_digest = {}
    for i, item in enumerate(ds.items):
        by_digest.setdefault(file_sha256(item.path), []).append(i)
    clashes = [idx for idx in by_digest.values() if len({ds.items[i].label for i in idx}) > 1]
    if clashes:
        first = clashes[0]
        shown = " = ".join(f"{ds.items[i].path} ({ds.class_names[ds.items[i].label]})" for i in first[:2])
        problems.append(f"{where}: {len(clashes)} image{'s' if len(clashes) > 1 else ''} appear under two class "
                        f"labels (same SHA-256), e.g. {shown}")
    if problems:
        raise DataCheckError(problems)
    warnings_out = []
    if len(partitions) == 1:
        part_of = np.full(len(ds), -1)
        for p, idx in enumerate(partitions[0]):
            part_of[np.asarray(idx, dtype=np.int64)] = p
        leaks = [idx for idx in by_digest.values() if len({int(part_of[i]) for i in idx} - {-1}) > 1]
        if leaks:
            shown = " = ".join(str(ds.items[i].path) for i in leaks[0][:2])
            warnings_out.append(f"data leak: {len(leaks)} image{'s' if len(leaks) > 1 else ''} appear in more than "
                                f"one split (same SHA-256), e.g. {shown}; test metrics will be optimistic")
    return warnings_out


def kfold_dataset(ds: Dataset, k=10, seed=0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`stratified_group_kfold` over a Dataset, warning (UngroupedSplitWarning) when items lack group ids."""
    groups = ds.groups
    ungrouped = sum(g is None for g in groups)
    if ungrouped:
        warnings.warn(f"K-FOLD WITHOUT GROUP/PATIENT IDS FOR {ungrouped} OF {len(ds)} ITEMS ({ds.root}): related "
                      f"images may straddle train and test folds.", UngroupedSplitWarning, stacklevel=2)
    return stratified_group_kfold(ds.labels, groups if ds.has_groups else None, k, seed)


__all__ = ["IMAGE_EXTENSIONS", "DataCheckError", "Dataset", "DatasetError", "Item", "check_training_data",
           "file_sha256", "Split", "UngroupedSplitWarning", "discover",
           "group_stratified_split", "kfold_dataset", "split_dataset", "stratified_group_kfold",
           "stratified_split", "xray_group"]
