# syntax=docker/dockerfile:1
# megatron-tropd on NVIDIA's PyTorch container (ships CUDA, NCCL, Transformer Engine and apex built against its
# own torch). Two Python environments in one image:
#   - the trainer: the image's Python + torch/TE/apex, plus megatron-core 0.16.1 and this package;
#   - SGLang 0.5.23 in its own venv /opt/sglang (it pins torch 2.14.1; installing it into the image's Python would
#     replace the torch that TE/apex were built against). `tropd launch` starts servers with sglang.python.
# Build:  docker build -t megatron-tropd:0.1.0 .            (non-root: --build-arg RUN_AS=tropd)
# Enroot: enroot import -o megatron-tropd.sqsh dockerd://megatron-tropd:0.1.0     (see docs/cluster.md)
ARG NGC_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3

# ---------------------------------------------------------------- builder: wheels and the SGLang venv
FROM ${NGC_IMAGE} AS builder
ARG SGLANG_VERSION=0.5.23
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY setup.py README.md requirements.txt constraints.txt ./
COPY megatron_tropd ./megatron_tropd
# The package as a wheel (the final stage installs it without the sources' build tooling).
RUN pip wheel --no-deps --wheel-dir /wheels .
# SGLang with its own pinned torch in a separate venv; --copies so the venv survives the COPY below.
RUN python -m venv --copies /opt/sglang \
    && /opt/sglang/bin/pip install "sglang[all]==${SGLANG_VERSION}" \
    && /opt/sglang/bin/python -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"

# ---------------------------------------------------------------- runtime
FROM ${NGC_IMAGE} AS runtime
ARG RUN_AS=root
ARG RUN_UID=1000
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TROPD_SGLANG_PYTHON=/opt/sglang/bin/python
WORKDIR /opt/megatron-tropd
COPY --from=builder /opt/sglang /opt/sglang
COPY --from=builder /wheels /tmp/wheels
COPY requirements.txt constraints.txt ./
COPY examples ./examples
COPY docs ./docs
COPY tools ./tools
# Keep the image's torch / TE / apex: freeze them as constraints so no dependency can replace them.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine|apex|flash[-_]attn|numpy)==' > /tmp/image-pins.txt \
    && pip install -c /tmp/image-pins.txt megatron-core==0.16.1 \
    && pip install -c /tmp/image-pins.txt /tmp/wheels/*.whl \
        "transformers==5.19.0" "safetensors==0.8.0" "omegaconf==2.4.0" "PyYAML==6.0.3" "tqdm==4.70.1" \
        "tensorboard==2.21.0" "matplotlib==3.11.2" "pandas==3.1.1" "pyarrow==26.0.1" \
        "reasoning-gym==0.1.25" "math-verify==0.9.0" "aiohttp==3.14.5" "requests==2.34.2" "psutil==7.2.2" \
    && rm -rf /tmp/wheels /tmp/image-pins.txt \
    && python -c "import megatron.core, megatron_tropd, transformer_engine; print('megatron-core', megatron.core.__version__)"
RUN if [ "${RUN_AS}" != "root" ]; then \
        useradd --create-home --uid "${RUN_UID}" --shell /bin/bash "${RUN_AS}" \
        && chown -R "${RUN_AS}" /opt/megatron-tropd; \
    fi
USER ${RUN_AS}
ENTRYPOINT []
CMD ["tropd", "--help"]
