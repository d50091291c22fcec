# vbs-deleter image: `docker build -t vbs-deleter .` from the repository root.
# Runs as an unprivileged user; the entrypoint is the vbs-deleter command (default: a worker).
#   docker run vbs-deleter worker | beat | check-config --project P | status ID | dlq list | simulate
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 vbs \
    && useradd --system --uid 10001 --gid vbs --no-create-home --shell /usr/sbin/nologin vbs
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/default.toml config/retention.example.toml /usr/share/vbs-deleter/
ENV PYTHONUNBUFFERED=1 VBS_LOG_FORMAT=json
USER 10001:10001
# /metrics, /healthz and /readyz of a worker (VBS_METRICS_PORT); /metrics of the beat (VBS_BEAT_METRICS_PORT)
EXPOSE 9808 9809
# SIGTERM starts the warm shutdown: VBS_SHUTDOWN_GRACE, then waiting deletions go back to the queue
STOPSIGNAL SIGTERM
ENTRYPOINT ["vbs-deleter"]
CMD ["worker"]
