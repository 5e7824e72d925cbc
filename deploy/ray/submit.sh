#!/bin/sh
# Run a job on a Ray cluster: the shards are Ray tasks (retried by Ray when a node or worker
# dies, each resuming from its ledger), merged by the driver at the end.
# With output.upload_uri set, the shards upload and the merge reads them from S3, so the
# nodes need not share a file system; the shards' split (split.json) is kept there too.
# Without it, the output directory must be one every node sees.
set -eu
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env-json '{"pip": ["rekbatch[ray,parquet]"], "working_dir": "."}' \
  -- rekbatch run job.toml --engine ray --shards 16 --ray-address auto
