#!/bin/sh
# Submit the job as an AWS Batch array job of 8 children, AWS_BATCH_JOB_ARRAY_INDEX = 0..7.
# The array size must equal --shards in the job definition's command. The children divide
# the bucket's listing once: the first to start stores the split under output.upload_uri
# (REKBATCH_OUTPUT__UPLOAD_URI in the job definition), the others read it, each lists only
# its part. Submitting the job again after a change of sources: remove split.json there.
# /config/job.toml is baked into the image (or mounted from EFS); see deploy/Dockerfile.
set -eu
aws batch register-job-definition --cli-input-json file://deploy/aws-batch/job-definition.json
aws batch submit-job \
  --job-name rekbatch-wheres-ric \
  --job-queue rekbatch-queue \
  --job-definition rekbatch \
  --array-properties size=8
# When all 8 children succeeded:
#   rekbatch merge s3://results-bucket/wheres-ric/ --output merged/
