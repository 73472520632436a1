"""Seeing a run: the HTML run report (`run_page`, `<output_dir>/<output_name>_report.html`) and the comparison of
several runs (`compare`, `tools/compare_runs.py`), both built from what a run already writes - the `history`,
`settings` and `param_groups` sections of `<output_name>_report.json` (`history`: the schema, the writer-side
`history_section` and the validating reader), its sample images (`samples`), or a TensorBoard logging folder
(`sources`). Figures are matplotlib PNGs (`figures`), pages are self-contained HTML with the images inline
(`html`), so a report opens from disk with no network. May import only `library.files` and `library.errors`
(no torch, no model code: a page builds in a second, in any Python that has matplotlib); `train` imports this
wing to write the report."""
