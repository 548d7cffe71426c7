"""Runestone's configuration: the schema, how it is loaded, and how bad values are reported.

A configuration is a tree of frozen attrs classes rooted at :class:`Config`.
:func:`load_config` reads a TOML file (the embedded default
``config/runestone.toml`` unless told otherwise), applies the environment
variables on top of the file's values, structures the result with cattrs
(strictly: ``"5"`` is not an integer, ``1`` is not ``true``, unknown keys are
errors) and then checks every value and the cross references between them
(provider names, failover groups). Every problem becomes one line naming the
key, the value given, where it came from and what is allowed; a secret is shown
as ``***``. The same machinery serves the control plane: a provider or a
failover group described as a dict (``{"name", "type", "config": {...}}``) is
read by :func:`provider_spec_from_dict` / :func:`group_spec_from_dict` and
written back by :func:`provider_spec_to_dict` / :func:`group_spec_to_dict`.
Loading is synchronous and done once at start (or on a control message); none
of this runs per request.
"""

# The package, by job (imports point down this list; the schema imports only the field checks):
#   _checks.py    field checks (each with the words for what it allows), the upstream URL parser, host allow-list
#   provider_types.py  the registry of provider types (adapter, capabilities, base URL, knobs, env)
#   orderings.py  the registries of router policies and failover strategies (each name's ordering)
#   pricing.py    the one ModelPrice, price_for (the table's lookup) and cost_of
#   schema.py     the attrs classes rooted at Config, the enumerations and default model lists
#   _report.py    strict cattrs structuring and one-line problem reports (ConfigError)
#   _validate.py  checks across fields: references, uniqueness, a provider's settings together
#   _env.py       the environment overlay (the only module that knows variable names)
#   load.py       files: the TOML document, the pricing table; load_config
#   forms.py      the control plane's dict forms of a provider and a failover group

from ._checks import parse_upstream_url as parse_upstream_url
from ._checks import upstream_host_allowed as upstream_host_allowed
from .schema import AZURE_AUTH as AZURE_AUTH
from .schema import AdminConfig as AdminConfig
from .schema import AuthConfig as AuthConfig
from .schema import BudgetsConfig as BudgetsConfig
from .schema import CacheConfig as CacheConfig
from .schema import CircuitBreakerConfig as CircuitBreakerConfig
from .schema import ClusterConfig as ClusterConfig
from .schema import Config as Config
from .schema import DEFAULT_BASE_URLS as DEFAULT_BASE_URLS
from .schema import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG_PATH
from .schema import DEFAULT_PRICING_PATH as DEFAULT_PRICING_PATH
from .schema import DataConfig as DataConfig
from .schema import DatabaseConfig as DatabaseConfig
from .schema import FailoverConfig as FailoverConfig
from .schema import FailoverGroupSpec as FailoverGroupSpec
from .schema import LimitsConfig as LimitsConfig
from .schema import LogConfig as LogConfig
from .schema import MetricsConfig as MetricsConfig
from .schema import OPENAI_PRESETS as OPENAI_PRESETS
from .schema import OtelConfig as OtelConfig
from .schema import PROVIDER_TYPES as PROVIDER_TYPES
from .schema import PoolConfig as PoolConfig
from .schema import ProviderConfig as ProviderConfig
from .schema import ProviderSpec as ProviderSpec
from .schema import RETIRED_PROVIDER_SETTINGS as RETIRED_PROVIDER_SETTINGS
from .schema import ResponsesConfig as ResponsesConfig
from .schema import RetryConfig as RetryConfig
from .schema import RouterConfig as RouterConfig
from .schema import ServerConfig as ServerConfig
from .schema import SplitConfig as SplitConfig
from .schema import SplitVariantConfig as SplitVariantConfig
from .schema import TRANSPORTS as TRANSPORTS
from .schema import TelemetryConfig as TelemetryConfig
from .schema import data_dir_default as data_dir_default
from .pricing import ModelPrice as ModelPrice
from .pricing import cost_of as cost_of
from .pricing import price_for as price_for
from .provider_types import ANTHROPIC_DEFAULT_MODELS as ANTHROPIC_DEFAULT_MODELS
from .provider_types import OPENAI_DEFAULT_MODELS as OPENAI_DEFAULT_MODELS
from .provider_types import PROVIDER_TYPE_REGISTRY as PROVIDER_TYPE_REGISTRY
from .provider_types import EnvProvider as EnvProvider
from .provider_types import ProviderType as ProviderType
from .provider_types import provider_type as provider_type
from .orderings import FAILOVER_STRATEGY_REGISTRY as FAILOVER_STRATEGY_REGISTRY
from .orderings import ROUTER_POLICY_REGISTRY as ROUTER_POLICY_REGISTRY
from .orderings import NamedOrdering as NamedOrdering
from ._report import ConfigError as ConfigError
from .load import check_config as check_config
from .load import load_config as load_config
from .load import load_pricing as load_pricing
from .forms import config_to_dict as config_to_dict
from .forms import group_spec_from_dict as group_spec_from_dict
from .forms import group_spec_to_dict as group_spec_to_dict
from .forms import provider_spec_from_dict as provider_spec_from_dict
from .forms import provider_spec_to_dict as provider_spec_to_dict
# Read by tests/test_readme.py, which checks that the README lists every variable.
from ._env import _AWS_ENV, _ENV_PROVIDER_SETTINGS, _ENV_PROVIDERS, _ENV_SETTINGS  # noqa: F401

from . import forms, load, orderings, pricing, provider_types, schema  # noqa: E402 - the modules, for __all__

__all__ = [
    *schema.__all__, *pricing.__all__,
    *provider_types.__all__, *orderings.__all__,
    *load.__all__, *forms.__all__, "ConfigError", "parse_upstream_url", "upstream_host_allowed"]
