"""Drafters behind one Drafter interface (DSpark, DFlash, Eagle3, MTP-1): not built yet."""
