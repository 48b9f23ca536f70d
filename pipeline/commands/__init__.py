"""The entries of the `segpipe` commands that are tools rather than DVC stages (`dataset`, `manifest`,
`weightmap`): one module each, mapped by `pipeline.cli.COMMANDS`; the stages' are in `pipeline.stages`."""
