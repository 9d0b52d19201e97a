"""Parses a node's metrics with the Prometheus project's own OpenMetrics parser, for
tests/metrics.rs.

Usage: parse.py URL fetches URL over HTTP/1.1 (as a Prometheus server in its default setup
would) and parses what it gets; parse.py - parses standard input. The parser is strict: a
malformed exposition (a missing `# EOF`, a counter sample without `_total`, a unit the name
does not end in, a family declared twice) is an error, and the script exits non-zero with it.
Otherwise it prints one JSON object: the content type, and every family and sample.
"""

import json
import sys
import urllib.request

try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as error:
    print(f"parse.py needs prometheus-client ({error})", file=sys.stderr)
    sys.exit(3)


def main():
    if len(sys.argv) != 2:
        print("usage: parse.py URL|-", file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == "-":
        text, content_type = sys.stdin.read(), None
    else:
        # No proxy: the node is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(sys.argv[1], timeout=10) as response:
            text = response.read().decode("utf-8")
            content_type = response.headers.get("Content-Type")
    families, samples = [], []
    for family in text_string_to_metric_families(text):
        families.append({"name": family.name, "type": family.type, "unit": family.unit})
        for sample in family.samples:
            samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
    print(json.dumps({"content_type": content_type, "families": families, "samples": samples}))


if __name__ == "__main__":
    main()
