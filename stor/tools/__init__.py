"""Operator tools on a stopped or running store's disks: scrub (and its report) and
evacuation. The CLI runs them; they use the blob service's methods, not its parts."""
