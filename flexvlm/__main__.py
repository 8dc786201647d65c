import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["check-data"]:
        from flexvlm.data.check import main as check_data

        sys.exit(check_data(sys.argv[2:]))
    from flexvlm.cli import main

    main()
