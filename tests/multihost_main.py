"""`python main.py ARGS` for tests/test_multihost.py's processes, sharing compiled programs.

Only process 0 writes persistent-cache entries, and on CPU jax keys them by what differs
between processes: a program over the whole mesh by the topology as the compiling
process sees it, a program on one device (the jitted initialisation) by that device's
id. So process 1 would never find an entry and would compile every program of every
launch itself: minutes per launch on two busy cores. Here a program's key uses the
devices' kinds instead of the topology (what jax falls back to where a backend has none)
and, for a one-device program, not the device's id (what jax does on GPUs, "to use cache
key as invariant between processes"), so every process of every later launch finds what
process 0 wrote. Nothing else differs from main.py; the change lives in these processes.
"""

import os
import runpy
import sys

from jax._src import cache_key

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")


hash_compile_options = cache_key._hash_serialized_compile_options


def devices_by_kind(hash_obj, devices) -> None:
    cache_key._hash_devices(hash_obj, devices)


def one_device_by_kind(hash_obj, compile_options, strip_device_assignment: bool = False):
    devices = compile_options.device_assignment
    one = devices is not None and devices.replica_count() == devices.computation_count() == 1
    return hash_compile_options(hash_obj, compile_options, strip_device_assignment or one)


if __name__ == "__main__":
    cache_key._hash_accelerator_config = devices_by_kind
    cache_key._hash_serialized_compile_options = one_device_by_kind
    sys.argv[0] = MAIN
    sys.path.insert(0, os.path.dirname(MAIN))
    runpy.run_path(MAIN, run_name="__main__")
