"""The ground floor of raygpt: what every stage stands on, importing nothing else of the project.

    errors.py        UserError and RunFileError: the one-line errors a person sees
    files.py         the one front door for files: a local path or an s3:// / gs:// URI, atomic writes, JSON, records
    object_store.py  pyarrow file systems for object storage behind core.files (nobody else imports it)
    layout.py        where every file of a run lives (RunLayout), the only builder of run paths
    progress.py      the one format of progress lines and a throttled progress log
    config.py        the config Section base and the cluster section every stage shares

`data_pipeline`, `model`, `trainer` and `evaluation` stand on it; `cluster` (CLI, RunConfig, pipeline, serve, jobs,
report, the console filter) is the roof that composes them. tests/test_floors.py enforces the rule.
"""
