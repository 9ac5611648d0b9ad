"""Run a command and show how its memory grows layer by layer: RSS read every few seconds, grouped by the layers
done so far (read from the tqdm bar on its stderr), and its peak (VmHWM). Linux only.

    python eval/rss_trend.py -- python -m llm_sparsify.cli prune MODEL --recipe wanda-50 --calibration ids.pt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import threading
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=3.0, help="seconds between readings (default: 3)")
    parser.add_argument("--group", type=int, default=4, help="layers per line of the summary (default: 4)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = [0]  # layers finished, from the last "k/n [" the bar drew

    def follow_bar() -> None:
        tail = b""
        while chunk := process.stderr.read(256):
            tail = (tail + chunk)[-4096:]
            if found := re.findall(rb"(\d+)/\d+ \[", tail):
                done[0] = int(found[-1])

    threading.Thread(target=follow_bar, daemon=True).start()
    readings: dict[int, list[float]] = {}
    peak = 0.0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 2**20
            peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 2**20
            readings.setdefault(done[0] // args.group, []).append(rss)
        except (FileNotFoundError, AttributeError):  # exited between poll and read
            pass
        time.sleep(args.every)
    print(f"exit {process.returncode}, peak RSS (VmHWM) {peak:.2f} GiB")
    for group, values in sorted(readings.items()):
        first = group * args.group
        print(f"while layers {first}-{first + args.group - 1} ran: RSS max {max(values):.2f} GiB, "
              f"mean {sum(values) / len(values):.2f} GiB")
    return process.returncode


if __name__ == "__main__":
    raise SystemExit(main())
