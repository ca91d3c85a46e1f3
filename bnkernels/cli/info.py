"""``bnkernels info``: versions, the machine, and which backends run here and why not."""
from __future__ import annotations

import json

from .. import bench as bm
from .exits import EXIT_OK
from .tables import format_table


def info_data() -> dict:
    """What ``bnkernels info --json`` prints: :func:`bnkernels.bench.system_info`
    plus ``backends``, a list of ``{name, device, available, reason,
    install, details}`` (``details``: how a usable backend runs here)."""
    from .. import available_backends
    from ..backends import backend_details

    data = bm.system_info()
    data["backends"] = [
        {"name": s.name, "device": s.device, "available": s.available,
         "reason": s.reason, "install": s.install, "details": backend_details(s.name) if s.available else ""}
        for s in available_backends().values()
    ]
    return data


def run_info(args) -> int:
    data = info_data()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"bnkernels  {data['bnkernels']}")
    print(f"Python     {data['python']} ({data['python_implementation']}, {data['python_executable']})")
    print(f"NumPy      {data['numpy']}")
    print(f"torch      {data['torch'] or 'not installed'} (optional, compared against in bench)")
    print(f"Platform   {data['platform']}")
    print(f"CPU        {data['cpu']}")
    print(f"Cores      {data['cpu_count']} ({data['cpus_usable']} usable by this process)")
    print()
    rows = []
    for b in data["backends"]:
        if b["available"]:
            rows.append([b["name"], b["device"], "yes", b["details"]])
        else:
            rows.append([b["name"], b["device"], "no", f"why: {b['reason']}"])
            rows.append(["", "", "", f"to get it: {b['install']}"])
    print(format_table(["backend", "device", "usable", "details / why not / what to install"], rows,
                        [False] * 4, free_last=True))
    return EXIT_OK
