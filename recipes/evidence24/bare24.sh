# Sourced by quote_corpus.sh and section24.sh (PY: the interpreter): on a bare device machine (no flite, no moshi)
# it unpacks FLITE (default .exp24/flite.tar.xz) into /tmp/fl and installs WHEELS (default .exp24/whl/*.whl: moshi)
# into /tmp/site, as device1.sh does, then exports what finds them; what is there already is used as it is.
if ! command -v flite > /dev/null; then
  [ -x /tmp/fl/usr/bin/flite ] || { mkdir -p /tmp/fl && tar xJf "${FLITE:-.exp24/flite.tar.xz}" -C /tmp/fl; }
  export PATH=/tmp/fl/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/fl/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
if ! $PY -c "import moshi" 2> /dev/null; then
  [ -d /tmp/site/moshi ] ||
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ${WHEELS:-.exp24/whl/*.whl}
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} NO_TORCH_COMPILE=1
