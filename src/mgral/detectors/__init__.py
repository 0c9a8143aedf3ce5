"""Object detectors behind one protocol: torchvision models built from named presets (``models``),
trained by ``training``, adapted by ``torchvision_detector``; pool predictions cached by ``cache``."""
