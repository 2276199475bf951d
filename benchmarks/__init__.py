"""Small-scale reproduction of the TDM claims on a digits teacher the project trains itself.

``train_teacher`` makes the teacher, ``metrics`` the domain classifier and Frechet distance,
``demo`` is the README's main-job command; ``defaults`` measures the trainer's defaults on every benchmark
teacher; ``benchmarks/RESULTS.md`` lists every results table and the command that made it.
"""
