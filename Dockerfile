# One image recipe for every EMILI service (`make images` builds them all).
#
#   docker build --build-arg SERVICE=chat -t emili-chat:<tag> .
#   docker build --build-arg SERVICE=fer --build-arg VARIANT=gpu -t emili-fer:<tag>-gpu .
#   docker build --build-arg SERVICE=trainer --build-arg VARIANT=gpu -t emili-trainer:<tag>-gpu .
#
# The image installs the package `emili-<SERVICE>` with the dependencies its pyproject declares, every
# third-party version taken from requirements/constraints.txt: the images run what the tests ran. The local
# libraries are offered as wheels built from this checkout; nothing is listed by hand, so a service whose
# pyproject misses a library fails here (and in tests/test_service_dependencies.py), not in the cluster.
# One image runs both processes: the server (ENTRYPOINT; gRPC, or HTTP for the gateway) and the Celery worker
# (Kubernetes overrides the command with emili-<SERVICE>-worker; the gateway has none).

# An exact tag: a rebuild months later starts from the same Python and Debian release.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --------------------------------------------------------------------------- #
FROM ${PYTHON_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG SERVICE
# cpu, or gpu: onnxruntime-gpu (fer) or the CUDA build of torch (trainer).
ARG VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN set -eux; \
    case "${SERVICE:-}" in fer|chat|gateway|labeler|trainer) ;; *) echo "SERVICE must be fer, chat, gateway, labeler or trainer" >&2; exit 1 ;; esac; \
    case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu" >&2; exit 1 ;; esac; \
    python -m venv /opt/venv
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install -c requirements/constraints.txt pip setuptools wheel

# Heavy runtime first, so this layer survives source changes. The CPU build of torch comes from the
# PyTorch index (PyPI's default Linux wheel drags in several GB of CUDA); its version is the constraints'.
RUN set -eux; \
    torch=$(grep -E '^torch==' requirements/constraints.txt); \
    case "$SERVICE/$VARIANT" in \
      fer/cpu|gateway/cpu) ;; \
      fer/gpu) pip install -c requirements/constraints.txt "onnxruntime-gpu[cuda,cudnn]" ;; \
      trainer/gpu) pip install -c requirements/constraints.txt "$torch" ;; \
      */cpu) pip install -c requirements/constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu "${torch}+cpu" ;; \
      *) echo "no gpu variant of $SERVICE" >&2; exit 1 ;; \
    esac

COPY libs libs
COPY services services
RUN set -eux; \
    pip wheel --no-deps --wheel-dir /wheels libs/*/ services/*/; \
    pip install -c requirements/constraints.txt --find-links /wheels "emili-${SERVICE}"; \
    if [ "$VARIANT" = cpu ] && pip list 2>/dev/null | grep -iE '^nvidia-'; then echo "CUDA packages in a CPU image" >&2; exit 1; fi; \
    if [ "$SERVICE" = fer ] && pip show torch >/dev/null 2>&1; then echo "fer must not depend on torch" >&2; exit 1; fi; \
    if [ "$SERVICE/$VARIANT" = fer/gpu ] && pip show onnxruntime >/dev/null 2>&1; then \
      pip uninstall -y onnxruntime onnxruntime-gpu; pip install -c requirements/constraints.txt "onnxruntime-gpu[cuda,cudnn]"; \
    fi; \
    pip check; \
    python -c "import importlib, importlib.util as u; [importlib.import_module(m) for m in (f'emili_$SERVICE.{n}' for n in ('main', 'worker', 'tasks')) if u.find_spec(m)]"; \
    ln -s "/opt/venv/bin/emili-${SERVICE}-server" /opt/venv/bin/emili-server; \
    command -v "emili-${SERVICE}-server" emili

# Model artefacts baked into the image (read-only at runtime).
COPY scripts/fetch_artifacts.py scripts/fetch_artifacts.py
RUN python scripts/fetch_artifacts.py --service "$SERVICE" --dest /opt/emili/artifacts

# --------------------------------------------------------------------------- #
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="emili-${SERVICE}" \
      io.emili.service="${SERVICE}" \
      io.emili.variant="${VARIANT}"
RUN groupadd --system --gid 10001 emili \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/emili \
      --create-home --shell /usr/sbin/nologin emili \
 && mkdir -p /home/emili/.cache \
 && chown -R 10001:10001 /home/emili

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/emili/artifacts /opt/emili/artifacts

# The root filesystem is read-only in Kubernetes: only /tmp and /home/emili/.cache are writable (emptyDir
# volumes). The trainer's work and model-cache folders point there; other services ignore them.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/emili \
    XDG_CACHE_HOME=/home/emili/.cache \
    EMILI_ARTIFACTS_DIR=/opt/emili/artifacts \
    HF_HUB_OFFLINE=1 \
    EMILI_TRAINER__WORK_DIR=/tmp/emili-trainer \
    EMILI_TRAINER__MODEL_CACHE_DIR=/home/emili/.cache/emili-models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /home/emili

# Ports are the service's settings defaults (ARCHITECTURE.md, "One name per service"); the manifests
# declare them as containerPorts.
ENTRYPOINT ["emili-server"]
