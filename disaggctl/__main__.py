from disaggctl.cli import main

main()
