# fidel-lm model server: `fidellm serve` on CPU, for deploy/compose.yaml (three replicas behind nginx,
# sharing one Redis, scraped by Prometheus) or on its own:
#   docker build -t fidellm .
#   docker run -p 8000:8000 -v /abs/path/to/export:/models/model:ro -e FIDELLM_API_KEY=secret fidellm
# The model directory is mounted read-only at /models/model: an exported directory (`fidellm export hf`),
# which holds the tokenizer too, readable by the container's user (`chmod -R a+rX DIR`: safetensors
# writes owner-only files). docs/serving.md covers the flags and the deployment.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch's CPU build first, from the PyTorch CPU index: the default wheel brings gigabytes of CUDA
# libraries this image never uses, and installing the package afterwards keeps the torch already there.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/fidellm
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

# Run as an unprivileged user; the server writes nothing, so the model stays read-only.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fidellm
USER fidellm

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["fidellm", "serve"]
CMD ["/models/model", "--host", "0.0.0.0", "--port", "8000"]
