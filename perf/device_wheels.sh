# Sourced by the device scripts (gpu_tests.sh, int4_words_ab.sh, int4_land.sh). install_device_wheels
# installs the carried cp312 wheels (.whl, see perf/README.md) into /tmp/site once — a warm
# machine keeps /tmp between calls, and a lock lets copies of a script started side by side
# install once for all. Without a .whl folder (a machine where Fermi's dependencies are
# installed) it does nothing. PYTHON names the interpreter (default python3: the device's).
install_device_wheels() {
    [ -d .whl ] || return 0
    (
        flock 9
        if [ ! -e /tmp/site/.installed ]; then
            rm -rf /tmp/site
            "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
                touch /tmp/site/.installed
        fi
    ) 9>/tmp/fermi-site.lock
    [ -e /tmp/site/.installed ]
}

# in_tree DIR COMMAND...: run COMMAND in DIR with DIR's fermi first on the path and a compile
# cache of its own (the cache's key does not include fermi's source: two trees side by side
# must not load each other's graphs).
in_tree() {
    local dir=$1
    shift
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir FERMI_COMPILE_CACHE=$dir/.compile-cache "$@")
}

# apply_patch / unapply_patch: a patch on stdin applied to (taken out of) the current folder,
# by `patch`, else by `git apply` (which works outside a repository); with neither they fail.
apply_patch() {
    if command -v patch >/dev/null; then patch -p1 --quiet; else git apply -; fi
}
unapply_patch() {
    if command -v patch >/dev/null; then patch -R -p1 --quiet; else git apply -R -; fi
}

# patched_copy DIR PATCH COMMAND...: a copy of this tree's fermi, perf and tests at DIR, with
# COMMAND run there on PATCH (on its stdin: apply_patch, or unapply_patch to take a patch
# applied here out of the copy).
patched_copy() {
    local dir=$1 file
    file=$(realpath "$2") || return 1
    shift 2
    rm -rf "$dir" && mkdir -p "$dir" && cp -r fermi perf tests pyproject.toml "$dir"/ || return 1
    (cd "$dir" && "$@" <"$file")
}
