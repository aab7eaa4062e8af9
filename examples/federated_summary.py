"""Counts, means, variances and histograms over several hospitals, from each hospital's summary.

One task: every site runs the summary image (algorithms/summary/), which answers with exact sums
and refuses if any cell would hold fewer than --min-count patients. Sums and counts add up across
sites, so the pooled means and variances are exact.

    export PHT_REGISTRY_URL=https://registry.example.org PHT_TOKEN=...   # or ~/.config/pht/researcher.toml
    python examples/federated_summary.py --image registry.example.org/pht/summary:latest

--pooled-data FILE.csv (one row per patient) also computes the counts and means from all patients at
once and says whether they are equal; only the demo, with synthetic cohorts, can do that.
"""

import argparse
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

from researcher import RegistryError, SettingsError, TaskFailed, TaskTimeout, connect  # noqa: E402

VARIABLES = ["age", "sex", "stage", "smoker", "outcome"]
BINS = {"age": [50, 60, 70]}  # cut points; the other variables get one cell per value


def summarize_federated(registry, image, variables=VARIABLES, bins=BINS, min_count=5, sites=None):
    """Each site's summary and the pooled one: ({site: summary}, summary of all sites)."""
    task = registry.submit(image, {"variables": variables, "bins": bins, "min_count": min_count},
                           sites=sites, name="summary")
    per_site = {result.site: result.output for result in registry.wait_for_results(task["id"])}
    return per_site, pool(per_site.values())


def pool(summaries):
    summaries = list(summaries)
    pooled = {"patients": sum(summary["patients"] for summary in summaries), "variables": {}}
    for variable in summaries[0]["variables"]:
        parts = [summary["variables"][variable] for summary in summaries]
        histogram = Counter()
        for part in parts:
            histogram.update(part["histogram"])
        entry = {"count": sum(part["count"] for part in parts), "histogram": dict(histogram)}
        if all("sum" in part for part in parts):  # numeric at every site
            n = entry["count"]
            total = sum(Fraction(part["sum"]) for part in parts)
            squares = sum(Fraction(part["sum_of_squares"]) for part in parts)
            entry.update(sum=total, mean=float(total / n), variance=float((squares - total ** 2 / n) / (n - 1)))
        pooled["variables"][variable] = entry
    return pooled


def show(per_site, pooled):
    print(f"{'':<14} {'count':>6} {'mean':>9} {'variance':>9}  histogram")
    for variable in pooled["variables"]:
        print(variable)
        rows = [(site, summary["variables"][variable]) for site, summary in per_site.items()]
        for name, entry in rows + [("all sites", pooled["variables"][variable])]:
            mean = f"{entry['mean']:9.3f}" if "mean" in entry else " " * 9
            variance = f"{entry['variance']:9.3f}" if "variance" in entry else " " * 9
            cells = "  ".join(f"{label}: {count}" for label, count in entry["histogram"].items())
            print(f"  {name:<12} {entry['count']:>6} {mean} {variance}  {cells}")


def compare_with_pooled_data(pooled, csv_file):
    import pandas as pd

    data = pd.read_csv(csv_file)
    print("\nchecked against the pooled data:")
    for variable, entry in pooled["variables"].items():
        column = data[variable].dropna()
        checks = {"count": (entry["count"], len(column))}
        if "mean" in entry:
            checks["mean"] = (entry["mean"], column.astype(float).mean())
        verdict = "equal" if all(ours == theirs for ours, theirs in checks.values()) else "DIFFERENT"
        print(f"  {variable:<8} " + ", ".join(f"{what} {ours:.12g} (pooled {theirs:.12g})"
                                            for what, (ours, theirs) in checks.items()) + f": {verdict}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the summary algorithm image")
    parser.add_argument("--registry", help="the registry's URL (default: $PHT_REGISTRY_URL or the config file)")
    parser.add_argument("--site", action="append", dest="sites", help="a site to include (repeat; default all)")
    parser.add_argument("--min-count", type=int, default=5, help="smallest count a site may show (default 5)")
    parser.add_argument("--pooled-data", type=Path, help="CSV of every patient, to check the pooled counts and means")
    args = parser.parse_args(argv)

    per_site, pooled = summarize_federated(connect(args.registry), args.image, min_count=args.min_count,
                                           sites=args.sites)
    print(f"Federated summary of {pooled['patients']} patients at {len(per_site)} sites")
    show(per_site, pooled)
    if args.pooled_data is not None:
        compare_with_pooled_data(pooled, args.pooled_data)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SettingsError, RegistryError, TaskFailed, TaskTimeout) as error:
        sys.exit(f"error: {error}")
