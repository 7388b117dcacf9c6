# Sourced by bootstrap.sh and setup_vllm_cpu.sh: `pip_quiet PYTHON ARGS...` runs `PYTHON -m pip install -q ARGS`
# without pip's notices about this machine's optional local package folders ("Location ... is ignored": hundreds of
# lines of noise here); real errors still show, and pip's exit status is kept.
pip_quiet() {
  local python=$1
  shift
  "$python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
