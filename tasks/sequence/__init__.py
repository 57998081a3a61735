"""The stages of the sequence-cpo flow (flows/sequence_cpo.py), one module each: ingest, prepare_model, mle,
generate, train, wise_ft, scorer, evaluate, judge, report; `shared` holds what several of them use. No stage
module imports another: stages exchange files (StageResult paths) only."""
