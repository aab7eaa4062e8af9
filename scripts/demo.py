"""The walking skeleton's demo: a local federation of two sites, one task, each site's answer.

Run it through scripts/demo.sh, which prepares the machine first.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.federation import IMAGE_REGISTRY, LocalFederation  # noqa: E402

IMAGE = f"{IMAGE_REGISTRY}/pht/patient-count:latest"


def main():
    with LocalFederation(site_names=("hospital-a", "hospital-b"), patients_per_site=120) as federation:
        print(f"registry at {federation.registry_url}; sites: {', '.join(federation.sites)}")
        researcher = federation.researcher()
        task = researcher.submit(IMAGE, {"label": "how many patients?"})
        print(f"task {task['id']} posted: {IMAGE}")
        failed = False
        for result in researcher.wait_for_results(task["id"], timeout_seconds=300):
            if result.status == "completed":
                count = result.read_json("result.json")["patient_count"]
                print(f"{result.site}: {count} patients (image {result.image_digest[:19]}…)")
            else:
                failed = True
                print(f"{result.site}: {result.status}: {result.reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
