"""hdml_tf: Hardness-Aware Deep Metric Learning (Zheng et al., CVPR 2019) on TensorFlow 2 / Keras 3."""
__version__ = "0.1.0"
