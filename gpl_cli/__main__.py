from gpl_cli.cli import main

main()
