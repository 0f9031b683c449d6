"""#28: no import cycle inside loyalty, between packages or between the modules of one
(``lint-imports`` in ``make lint`` checks the layers between packages; a module
importing its own package's ``__init__``, as the CLI's groups did, is no layer
violation, so this test looks at every module). Imports inside functions count: they
are cycles all the same, only deferred."""

from __future__ import annotations

import grimp

# Today's cycles, each broken at one import; the line goes when the part of #28 that
# removes the import merges (a listed import that no longer exists fails the test).
KNOWN: set[tuple[str, str]] = set()


def import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("loyalty", cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Each cycle once, as the chain of imports from its first module back to it."""
    found: dict[frozenset[str], tuple[str, ...]] = {}
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                found.setdefault(frozenset(chain), (module, *chain))
    return list(found.values())


def without_known(graph: grimp.ImportGraph) -> grimp.ImportGraph:
    for importer, imported in KNOWN:
        assert graph.direct_import_exists(importer=importer, imported=imported), (
            f"{importer} no longer imports {imported}: delete it from KNOWN"
        )
        graph.remove_import(importer=importer, imported=imported)
    return graph


def test_no_module_of_loyalty_is_in_an_import_cycle() -> None:
    found = cycles(without_known(import_graph()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_check_finds_a_cycle_through_a_package_init() -> None:
    # the shape the CLI had: a command group importing its package, which imports it
    graph = without_known(import_graph())
    graph.add_import(importer="loyalty.cli.expiry", imported="loyalty.cli")
    assert ("loyalty.cli", "loyalty.cli.expiry", "loyalty.cli") in cycles(graph)
