# One image for every project service and stream worker; the command picks the role.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONPATH=/app
WORKDIR /app
RUN pip install 'uv>=0.4,<1'
COPY requirements.lock pyproject.toml ./
RUN uv pip install --system -r requirements.lock && uv pip install --system --no-deps 'recbole==1.2.1'
COPY recstream ./recstream
COPY streams ./streams
COPY services ./services
COPY schemas ./schemas
COPY bench ./bench
# run state (the learned policy's files): writable by the image's user and by a trainer run as the
# host user (compose's `user:`)
RUN mkdir -p /app/run && chmod 1777 /app/run
USER nobody
CMD ["python", "-m", "streams.worker"]
