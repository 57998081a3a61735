"""The typed configuration of alma-r's flows: one pydantic section per stage, loaded from YAML, overridable with
`--set a.b=value`. Every section forbids unknown keys, and a misspelt key fails with the nearest valid one, so that
a typo never silently falls back to a default and wastes a GPU day.

- base.py: the section base class, ConfigError, `sample:` paths, the sections fingerprint;
- run.py: RunConfig, the build-alma-r flow's sections (ingest.py: the sources; generate.py: the candidate
  systems);
- sequence.py: SequenceRunConfig, the sequence-cpo flow's sections;
- loading.py: YAML + overrides -> a validated config, and its JSON form for stage requests.
"""

from alma_r.config.base import SAMPLE_DIR, SAMPLE_PREFIX, ConfigError, Section, resolve_path, sections_hash
from alma_r.config.generate import DecodingConfig, EndpointSection, GenerateSection
from alma_r.config.ingest import IngestSection, SourceConfig
from alma_r.config.loading import (
    config_base_dir,
    config_from_json,
    config_to_json,
    load_config,
    parse_overrides,
)
from alma_r.config.run import (
    DEFAULT_COMET_MODELS,
    STRING_METRICS,
    CometModel,
    EvaluateSection,
    ImportedSystem,
    LoraConfig,
    ModelSection,
    RunConfig,
    RunSection,
    ScoreSection,
    SelectSection,
    SftSection,
    TinyModelConfig,
    TrainSection,
)

__all__ = [
    "CometModel",
    "DEFAULT_COMET_MODELS",
    "DecodingConfig",
    "EndpointSection",
    "EvaluateSection",
    "GenerateSection",
    "ImportedSystem",
    "IngestSection",
    "LoraConfig",
    "ModelSection",
    "RunSection",
    "STRING_METRICS",
    "ScoreSection",
    "SelectSection",
    "SftSection",
    "SourceConfig",
    "TinyModelConfig",
    "TrainSection",
    "SAMPLE_DIR",
    "SAMPLE_PREFIX",
    "ConfigError",
    "RunConfig",
    "Section",
    "config_base_dir",
    "config_from_json",
    "config_to_json",
    "load_config",
    "parse_overrides",
    "resolve_path",
    "sections_hash",
]
