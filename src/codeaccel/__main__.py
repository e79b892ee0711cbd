from codeaccel.cli import main

main()
