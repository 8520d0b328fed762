#!/usr/bin/env bash
# Dask conformance: distributed's own scheduler, stealing, resources and adaptive tests
# of the installed release (../shared/conformance/run.sh picks them by the installed
# distributed's version; they are distributed's, not ours, and are not copied here),
# run three times: with a no-op SchedulerPlugin (the baseline), with the bare router,
# and with the router holding a registered context. The router must pass exactly what the baseline passes.
# Each failure is retried once (timing-sensitive tests fail on a loaded machine in the
# baseline too); a failure that repeats is a break.
# PYTHON: the interpreter whose distributed is tested (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${CONFORMANCE_SUITE:-../shared/conformance}
[ -x "$suite/run.sh" ] || { echo "conformance: $suite/run.sh not found (distributed's tests live at ../shared/conformance)" >&2; exit 1; }
out=${CONFORMANCE_OUT:-$(mktemp -d)}
tests=(distributed/tests/test_steal.py distributed/tests/test_resources.py
       distributed/tests/test_scheduler.py distributed/deploy/tests/test_adaptive.py)
for variant in "baseline=" "bare=tests.conformance_plugins:bare_router" \
               "context=tests.conformance_plugins:router_with_context"; do
  name=${variant%%=*}
  echo "== conformance: $name"
  "$suite/run.sh" "${variant#*=}" "${tests[@]}" --reruns 1 --junitxml="$out/$name.xml" \
    > "$out/$name.log" 2>&1
  tail -n 1 "$out/$name.log"
done
exec "${PYTHON:-python}" .ci/compare_conformance.py "$out/baseline.xml" "$out/bare.xml" "$out/context.xml"
