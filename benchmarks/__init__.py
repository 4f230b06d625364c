"""Load benchmarks of meshctl against direct, Envoy, HAProxy and nginx; run with `bash benchmarks/run.sh`."""
