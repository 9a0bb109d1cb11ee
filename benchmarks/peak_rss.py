"""
Run a command and write its peak resident memory (RSS) in kilobytes to a file; exit with its exit code:

    python benchmarks/peak_rss.py FILE COMMAND [ARGUMENT ...]

The peak is wait4's ru_maxrss for the command: the largest of its own process and of the processes it
waited for (torchrun's workers, for one). The benchmarks run every command through this small launcher
because Linux folds the memory of the process a command was started from into the command's ru_maxrss
(exec records the memory it replaces), so a benchmark holding networks in memory would read its own size
in every command it started; from here, that floor is this launcher's own few megabytes.
"""

import os
import subprocess
import sys


def main() -> None:
    peak_file, command = sys.argv[1], sys.argv[2:]
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    with open(peak_file, "w") as stream:
        stream.write(str(usage.ru_maxrss))
    sys.exit(process.returncode if process.returncode >= 0 else 128 - process.returncode)  # killed: 128 + signal


if __name__ == "__main__":
    main()
