# Stage 6: tables, statistics and figures per experiment; DAG leaves shown in the report.


localrules:
    aggregate,
    figures,
    compare_to_paper,


rule aggregate:
    input:
        runs=get_experiment_runs,
        probes=get_experiment_probes,
        plasticity=get_experiment_plasticity,
        bounds=get_experiment_bounds,
        criteria=get_experiment_criteria,
        trajectory=get_experiment_trajectory,
    output:
        tables=[f"results/tables/{{experiment}}/{table}.csv" for table in TABLES],
        # The same tables as HTML, shown inline by `snakemake --report`.
        pages=[
            report(
                f"results/tables/{{experiment}}/{table}.html",
                caption=registry.caption("table", table),
                category="Tables",
                subcategory="{experiment}",
                labels={"table": table, "experiment": "{experiment}"},
            )
            for table in TABLES
        ],
    log:
        "results/logs/aggregate/{experiment}.log",
    conda:
        "../../envs/vitplasticity.yaml"
    params:
        settings=get_aggregate_settings,
        out_dir=get_tables_dir,
    shell:
        "vitplasticity aggregate --settings {params.settings:q} --runs {input.runs} "
        "--probes {input.probes} --plasticity {input.plasticity} --bounds {input.bounds} "
        "--criteria {input.criteria} --trajectory {input.trajectory} "
        "--out-dir {params.out_dir} 2> {log}"


rule figures:
    input:
        tables=rules.aggregate.output.tables,
    output:
        figures=[
            report(
                f"results/figures/{{experiment}}/{figure}.png",
                caption=registry.caption("figure", figure),
                category="Figures",
                subcategory="{experiment}",
                labels={"figure": figure, "experiment": "{experiment}"},
            )
            for figure in FIGURES
        ],
        pdfs=[f"results/figures/{{experiment}}/{figure}.pdf" for figure in FIGURES],
    log:
        "results/logs/figures/{experiment}.log",
    conda:
        "../../envs/vitplasticity.yaml"
    params:
        tables=get_tables_dir,
        figures=get_figures_dir,
    shell:
        "vitplasticity figures --tables {params.tables} --out-dir {params.figures} "
        "2> {log}"


rule compare_to_paper:
    input:
        tables=rules.aggregate.output.tables,
        probes=get_experiment_probes,
    output:
        table=report(
            f"results/tables/{{experiment}}/{registry.PAPER_COMPARISON}.csv",
            caption=registry.caption("table", registry.PAPER_COMPARISON),
            category="Tables",
            subcategory="{experiment}",
        ),
        figure=report(
            f"results/figures/{{experiment}}/{registry.PAPER_COMPARISON}.png",
            caption=registry.caption("figure", registry.PAPER_COMPARISON),
            category="Figures",
            subcategory="{experiment}",
        ),
    log:
        "results/logs/compare_to_paper/{experiment}.log",
    conda:
        "../../envs/vitplasticity.yaml"
    params:
        tables=get_tables_dir,
    shell:
        "vitplasticity compare-paper --tables {params.tables} --probes {input.probes} "
        "--out-table {output.table} --out-figure {output.figure} 2> {log}"
