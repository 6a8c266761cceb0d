"""A job, start to finish: `run_job(config)` knows the order plan -> data + model -> training ->
artifacts; resume decides whether a checkpoint belongs to this run."""
