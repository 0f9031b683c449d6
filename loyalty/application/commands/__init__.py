"""The command models every entrypoint uses (the API's routes, the console's pages, the
CLI's commands): one pydantic model per command body, validating it, naming each
problem's location, publishing the OpenAPI schema and building the domain's values.
One module per command group."""
