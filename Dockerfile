# Minimal image for now; the packaging issue turns this into the pinned NGC-based build.
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /opt/megatron-tropd
COPY setup.py requirements.txt constraints.txt ./
COPY megatron_tropd ./megatron_tropd
RUN pip install --no-cache-dir megatron-core==0.16.1 && pip install --no-cache-dir --no-deps -e .
