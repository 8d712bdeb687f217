"""Math-Verify worker process of :class:`a2r.eval.grading.AnswerChecker` (not a public module).

Reads one JSON object per line on stdin, ``{"gold": ..., "prediction": ...}`` (LaTeX strings),
and writes one per line on stdout: ``{"correct": bool, "parsed_gold": bool,
"parsed_prediction": bool}`` or ``{"error": "..."}``. Math-Verify's SIGALRM timeouts are off: the
parent bounds each check by killing this process.
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> None:
    logging.disable(logging.WARNING)  # Math-Verify warns that its timeouts are off: we know
    from math_verify import parse, verify

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse(request["gold"], parsing_timeout=None)
            prediction = parse(request["prediction"], parsing_timeout=None)
            correct = bool(gold and prediction and verify(gold, prediction, timeout_seconds=None))
            reply = {"correct": correct, "parsed_gold": bool(gold),
                     "parsed_prediction": bool(prediction)}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which decides
            reply = {"error": f"{type(err).__name__}: {err}"[:200]}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
