from agentbus.cli.main import main

main()
