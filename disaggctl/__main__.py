from disaggctl.cli.main import main

main()
