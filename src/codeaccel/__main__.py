from codeaccel.cli.app import main

main()
