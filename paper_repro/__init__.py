"""paper_repro: the experiments of the COLA reproduction (theory T1-T5 and the LM tables/figures).

Entry points: `python paper_repro/run_all.py --profile smoke|cpu|gpu` (run everything, resumably) and
`python paper_repro/make_figures.py` (figures, tables and figures/REPORT.md from saved results only).
`paper_repro.reference` holds the paper's recovered numbers, shown only as labelled reference values.
"""
