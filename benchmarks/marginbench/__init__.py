"""The benchmark behind ``benchmarks/bench_fused.py``, one concern per module:

    common     the case / plan records, list parsing, order statistics, machine facts
    providers  what is timed, and the names tables and plots give it
    worker     one case in a fresh process: round-robin timing (blocks of steps), warm peak memory
    planning   which cases run, cut into prioritised fresh-process tasks
    report     tidy rows, the Markdown table, the CSV, the plots
    modelreport the roofline model (benchmarks/model.py) beside the measured times (--model)
    driver     the command line and the run; its docstring says how everything is measured
    trainstep  --train-step: the three optimizer paths, one (case, path) per fresh process
    trainrun   --train-step: its cases, tasks and run
    trainreport --train-step: rows, CSV, tables, plot, bytes per class and GPU capacity
"""
