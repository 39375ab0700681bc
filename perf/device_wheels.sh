# Sourced by the device scripts (gpu_tests.sh, int4_words_ab.sh): install_device_wheels
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
