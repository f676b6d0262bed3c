"""Load and faults: the locust file and what tests and drills share to drive `serve run`.

- locustfile.py: OpenAI, native and gRPC users with answers checked (`locust -f loadtest/locustfile.py`);
- serve_run.py: `serve run` of a config on a local Ray, ports and teardown; local_cluster.py: a multi-node one;
- hostile.py: generated hostile requests for both protocols;
- drills/: reliability (overload, replica and ingress kills, hostile input), gcs_outage (the head's GCS killed),
  eviction (a GPU worker's node drained by deploy/node_drain.py), each one JSON line.
"""
