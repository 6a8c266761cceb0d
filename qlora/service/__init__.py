"""`qlora serve`: a persistent training queue over HTTP, a thin shell over `qlora train`.

Each module has one job: store (SQLite job records), security (token, paths inside the root),
submission (a posted config -> a job folder, validated like the CLI), process (how qlora
subprocesses are started), runner (the scheduler: each `qlora train` on the GPU slots it asked
for; several GPUs: `qlora train --nproc N`), shepherd (the single-threaded process between the
service and a job), events (job views
and server-sent events from a job's files), summary (a job's numbers for the page, from its
config, metrics.jsonl and summary.json), artifacts (adapter archives), files (uploads), app
(the HTTP routes; its sub-command is qlora.cli.serve). Nothing here imports torch: the training and the
data checks run in subprocesses.
"""
