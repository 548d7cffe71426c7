"""The config package's re-exports stay in step with its modules' public names."""

import importlib

import runestone.config as config

MODULES = ["schema", "pricing", "provider_types", "orderings", "load", "forms"]


def test_every_public_name_of_a_module_is_reexported_as_the_same_object():
    for name in MODULES:
        module = importlib.import_module(f"runestone.config.{name}")
        for public in module.__all__:
            assert getattr(config, public) is getattr(module, public), (name, public)


def test_all_lists_exactly_what_the_package_exports():
    exported = {n for n in vars(config) if not n.startswith("_")} - {
        "schema", "pricing", "provider_types", "orderings", "load", "forms",  # the modules themselves
    }
    assert set(config.__all__) == exported
