"""Readers for foreign checkpoint files: they turn bytes into plain NumPy arrays, nothing more.

Each reader gives the arrays back in the *source* layout with the source's names and
metadata; mapping them onto lightcnn parameter names (and transposing OIHW -> HWIO) is
done elsewhere, once, at conversion time.

  pth.read_pth(path)                          PyTorch state_dict (zip or legacy pickle
                                              stream) -> {name: ndarray}, without torch,
                                              through an allow-list unpickler
  tflite.read_tflite(path)                    TFLite flatbuffer -> TFLiteModel (tensors with
                                              quantisation, operators with options, buffers)
  keras_h5.read_keras_h5(path)                Keras 2 .h5 (model.save_weights / model.save) ->
                                              KerasH5 ({layer: {variable: ndarray}}, model_config),
                                              with h5py, without TensorFlow
  deep_compression.read_deep_compression(p)   Song Han's SqueezeNet v1.0 Deep-Compression
                                              .net -> {layer: (weight OIHW, bias)}

Every failure is a `lightcnn.errors.CheckpointError` (or its subclass
`UnsafePickleError`) with one line naming the file and the problem.
"""
