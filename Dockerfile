# hdml_tf on a GPU: the official TensorFlow image of the pinned version (TensorFlow 2.21, CUDA and cuDNN inside).
#
#   docker build -t hdml_tf:2.21 .
#   docker run --gpus all --rm --user "$(id -u):$(id -g)" \
#     -v /path/to/CUB_200_2011:/data/CUB_200_2011:ro -v /path/to/weights:/weights:ro -v "$PWD/runs:/runs" \
#     hdml_tf:2.21 --flagfile=configs/cub200_npair.cfg --data_dir=/data/CUB_200_2011 \
#     --weights=/weights/tf_ckpt_from_caffe.mat
#
# The entry point is tools/train.py (its flags follow the image name); the side-by-side table with the paper is
# tools/reproduce.py:  docker run ... --entrypoint python3 hdml_tf:2.21 tools/reproduce.py --flagfile=...
# Volumes: /data (data sets, read-only), /weights (ImageNet weights, read-only), /runs (results). The configs' relative
# --output_dir=runs/<name> lands in /runs/<name> (runs/ in the working directory is a link to /runs).
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras

WORKDIR /opt/hdml_tf
COPY setup.py ./
COPY hdml_tf ./hdml_tf
# The image's TensorFlow 2.21 satisfies install_requires, so pip keeps it (with its CUDA build) and adds the rest.
RUN python3 -m pip install --no-cache-dir . \
    && python3 -c "import hdml_tf, tensorflow as tf; assert tf.__version__.startswith('2.21'), tf.__version__"
COPY tools ./tools
COPY configs ./configs

# An unprivileged user (uid 1000); `docker run --user "$(id -u):$(id -g)"` works too: nothing below needs a home.
RUN useradd --create-home --uid 1000 --user-group hdml \
    && mkdir -p /data /weights /runs \
    && chown hdml:hdml /runs \
    && ln -s /runs /opt/hdml_tf/runs
VOLUME ["/data", "/weights", "/runs"]
USER 1000:1000

ENTRYPOINT ["python3", "tools/train.py"]
CMD ["--helpfull"]
