"""Object detectors: a classical baseline and torchvision models behind one interface."""
